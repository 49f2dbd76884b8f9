#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the packages of requirements.lock that
# the lent GPU machine's image lacks, for its Python 3.12, so that
# experiments/device_check.sh can install them there without a network.
#
#   bash experiments/device_wheels.sh      # here, where pip reaches the index
#   then the device tool: run(command="bash experiments/device_check.sh",
#                             carry=[".whl"])
#
# The list is requirements.lock minus the image's package list (recorded in
# the device tool's KINDS.md on 2026-11-17).  Binary wheels where the index has
# them; pure-Python source archives (promise, pydensecrf2's C++ extension)
# otherwise: device_check.sh builds those there, without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
MISSING=(array_record dm-tree docstring_parser googleapis-common-protos grain
         immutabledict importlib_resources ml_collections portpicker promise
         pycocotools pydensecrf2 simple-parsing tensorboardX tensorflow-datasets
         tensorflow-metadata termcolor toml tzdata)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in "${MISSING[@]}"; do
  pinned=$(grep -i -E "^${name//-/[-_]}==" requirements.lock | head -1)
  [[ -n "$pinned" ]] || { echo "not in requirements.lock: $name" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]}" -d .whl "$pinned" 2>/dev/null \
    || python3 -m pip download -q --no-deps --no-binary=:all: -d .whl "$pinned"
done
du -sh .whl
ls .whl
