"""File names of the `file` destination: the live file, rotated files, the lock.

For ``path: /data/orders.jsonl`` the live file is ``/data/orders.jsonl`` (with
``compression: zstd``: ``/data/orders.jsonl.zst``, unless ``path`` already ends in
``.zst``) and rotated files are ``/data/orders.000001.jsonl[.zst]``, numbered from
1 and zero-padded to six digits so they sort by name in the order written. The
stem is the file name without ``.zst`` and without the format's extension.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SEQ_DIGITS = 6


@dataclass(frozen=True)
class FileNames:
    directory: str
    live: str  # full path of the file being appended to
    stem: str  # file name prefix of rotated files
    suffix: str  # ".jsonl" or ".csv", plus ".zst" when compressed

    @classmethod
    def of(cls, path: str, extension: str, compressed: bool) -> FileNames:
        path = os.path.abspath(path)
        directory, base = os.path.split(path)
        live = path + ".zst" if compressed and not path.endswith(".zst") else path
        stem = base.removesuffix(".zst").removesuffix("." + extension)
        suffix = "." + extension + (".zst" if compressed else "")
        return cls(directory, live, stem or base, suffix)

    def rotated(self, seq: int) -> str:
        return os.path.join(self.directory, f"{self.stem}.{seq:0{SEQ_DIGITS}d}{self.suffix}")

    @property
    def lock(self) -> str:
        # A separate, hidden file: the live file is renamed away on rotation, so a
        # lock on it would not keep a second writer off the next live file.
        return os.path.join(self.directory, f".{os.path.basename(self.live)}.lock")

    def rotated_sequences(self) -> list[int]:
        """Sequence numbers of the rotated files present, ascending."""
        digits = r"\.(\d{" + str(SEQ_DIGITS) + r",})"
        pattern = re.compile(re.escape(self.stem) + digits + re.escape(self.suffix))
        found = []
        for name in os.listdir(self.directory):
            m = pattern.fullmatch(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)


def fsync_dir(directory: str) -> None:
    """Make renames and creations in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
