# make install [DESTDIR=/staging] [PREFIX=/usr/local]: see scripts/install.sh.
.PHONY: install check
install:
	DESTDIR="$(DESTDIR)" PREFIX="$(or $(PREFIX),/usr/local)" ./scripts/install.sh
check:
	./scripts/check.sh
