#!/bin/sh
# The base of every Atelier image, bootstrapped here from Debian's packages (no image registry is needed):
# Debian bookworm minbase with Python 3.11, git and tini. Built once per machine and kept: `make images`
# skips it while an image of this recipe (its hash is the image's label) exists.
#   usage: docker/base.sh [TAG]        (default atelier-base:bookworm; MIRROR=http://... to choose the mirror)
set -eu
TAG=${1:-atelier-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,ca-certificates,git,tini
RECIPE=$(printf '%s %s' "$PACKAGES" "$(cat "$0")" | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "atelier.recipe"}}' "$TAG" 2>/dev/null || true)" = "$RECIPE" ]; then
  echo "base image $TAG is up to date (recipe $RECIPE)"
  exit 0
fi
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install mmdebstrap" >&2; exit 3; }
echo "bootstrapping $TAG from $MIRROR (Debian bookworm minbase + $PACKAGES)..."
mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  bookworm - "$MIRROR" \
  | docker import --change "LABEL atelier.recipe=$RECIPE" --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG"
echo "base image $TAG built (recipe $RECIPE)"
