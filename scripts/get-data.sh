#!/usr/bin/env bash
# Make sure a dataset is available to prunekit: already on disk, downloaded from the
# official source when a network exists, or (offline, Debian-like systems, fashion-mnist)
# installed from Debian's dataset-fashion-mnist package. Otherwise say how to get it.
set -u
PY=${1:-python3}
NAME=${2:-fashion-mnist}
check() { "$PY" -c "from prunekit.data import get_dataset; get_dataset('$NAME', 'test', download=$1)" 2>/dev/null; }

if check False; then echo "dataset $NAME: found"; exit 0; fi
echo "dataset $NAME: not on disk, trying to download it..."
if check True; then echo "dataset $NAME: downloaded"; exit 0; fi
if [ "$NAME" = fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  echo "dataset $NAME: no network; installing Debian's dataset-fashion-mnist package..."
  if $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
     || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
    if check False; then echo "dataset $NAME: installed under /usr/share/datasets"; exit 0; fi
  fi
fi
# Print prunekit's own explanation (where it looked, how to get the data) and fail.
"$PY" -c "from prunekit.data import get_dataset; get_dataset('$NAME', 'test', download=False)" 2>&1 | tail -n 3
exit 1
