# Shared set-up for scripts/demo, scripts/test and scripts/bench: source it, then call
# `ensure_ready [extra cmake args...]`. Each step does nothing when its work is already done,
# so a second run reaches the real work within seconds.

CUSTOM_BN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${CUSTOM_BN_VENV:-$CUSTOM_BN_ROOT/.venv}"
BUILD_DIR="${CUSTOM_BN_BUILD_DIR:-$CUSTOM_BN_ROOT/build}"
PYTHON="${CUSTOM_BN_PYTHON:-$VENV/bin/python}"

log() { printf '[custom_bn] %s\n' "$*" >&2; }

# Debian packages the build uses. Missing ones are installed when we may (root or sudo);
# ccache only speeds builds up, so its absence is not fatal.
ensure_system_packages() {
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v ninja >/dev/null || missing+=(ninja-build)
  command -v g++ >/dev/null || missing+=(g++)
  command -v ccache >/dev/null || missing+=(ccache)
  [ -f /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
  [ -f /usr/include/gloo/algorithm.h ] || missing+=(libgloo-dev)  # the C++ SyncBatchNorm test
  # scripts/bench runs torch a second time under tcmalloc (LD_PRELOAD)
  [ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || missing+=(libtcmalloc-minimal4)
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      log "missing Debian packages (${missing[*]}) and no root to install them"
      return 0
    fi
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } ||
    log "could not install ${missing[*]}; continuing without them"
}

# .venv with requirements.txt installed; reinstalls only when requirements.txt changes.
ensure_venv() {
  local stamp="$VENV/.requirements.sha256"
  local want
  want="$(sha256sum "$CUSTOM_BN_ROOT/requirements.txt" | cut -d' ' -f1)"
  if [ -x "$PYTHON" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  log "setting up $VENV (torch from PyPI; the first time takes a few minutes)"
  [ -x "$PYTHON" ] || python3 -m venv "$VENV"
  "$PYTHON" -m pip install -q --upgrade pip >/dev/null
  "$PYTHON" -m pip install -q -r "$CUSTOM_BN_ROOT/requirements.txt"
  echo "$want" >"$stamp"
}

# Configures build/ once (against the venv's LibTorch), then builds incrementally.
ensure_build() {
  if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
    local prefix launcher=()
    prefix="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
    command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
    log "configuring $BUILD_DIR"
    mkdir -p "$BUILD_DIR"
    cmake -S "$CUSTOM_BN_ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$prefix" -DPython_EXECUTABLE="$PYTHON" "${launcher[@]}" "$@" >"$BUILD_DIR/configure.log" 2>&1 ||
      { cat "$BUILD_DIR/configure.log" >&2; return 1; }
  fi
  log "building $BUILD_DIR"
  # Paths below the checkout hashed as relative ones, so that moving a checkout keeps its cache.
  CCACHE_BASEDIR="${CCACHE_BASEDIR:-$CUSTOM_BN_ROOT}" cmake --build "$BUILD_DIR" --parallel "$(nproc)"
}

ensure_ready() {
  ensure_system_packages
  ensure_venv
  ensure_build "$@"
}
