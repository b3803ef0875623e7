# shellcheck shell=bash
# Installs what tmoe's scripts need on Debian 12, sourced by scripts/test and scripts/demo.
#   tmoe_ensure_debian_packages   the compilers, CMake, Ninja and the C++ dependencies (apt-get, only if missing)
#   tmoe_ensure_python_packages [MODULE...]   Python packages (pip, only if not importable); by default numpy,
#                                 safetensors and sacrebleu for the Python cross-checks

# Debian packages for building and testing tmoe.
TMOE_DEBIAN_PACKAGES=(cmake ninja-build g++ clang libeigen3-dev doctest-dev nlohmann-json3-dev libbenchmark-dev
                      libsentencepiece-dev python3 python3-pip)

tmoe_log() { printf '==> %s\n' "$*" >&2; }

# Runs a command as root: directly when we are root, through sudo otherwise.
tmoe_as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    tmoe_log "need root to run: $* (not root, and sudo is not installed)"
    return 1
  fi
}

tmoe_ensure_debian_packages() {
  local missing=() pkg
  for pkg in "${TMOE_DEBIAN_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    tmoe_log "missing packages: ${missing[*]}; install them (apt-get is not available here)"
    return 1
  fi
  tmoe_log "installing missing Debian packages: ${missing[*]}"
  tmoe_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  tmoe_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

tmoe_ensure_python_packages() {
  local modules=("$@") missing=() mod
  if (($# == 0)); then modules=(numpy safetensors sacrebleu); fi
  for mod in "${modules[@]}"; do
    python3 -c "import ${mod}" >/dev/null 2>&1 || missing+=("$mod")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  tmoe_log "installing missing Python packages: ${missing[*]}"
  # Debian 12's system Python is "externally managed" (PEP 668): pip refuses without --break-system-packages.
  local flags=(--quiet --disable-pip-version-check)
  if python3 -c 'import sys, sysconfig, os; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' \
      && [[ -z ${VIRTUAL_ENV:-} ]]; then
    flags+=(--break-system-packages)
  fi
  python3 -m pip install "${flags[@]}" "${missing[@]}"
  for mod in "${missing[@]}"; do
    python3 -c "import ${mod}" || { tmoe_log "Python package ${mod} is still not importable"; return 1; }
  done
}

# The CUDA toolkit is optional. When nvcc is installed but not on PATH (the toolkit's default /usr/local/cuda), point
# CMake at it, so the release build compiles the CUDA tests and benchmarks (they run only on a GPU machine).
tmoe_find_nvcc() {
  if [[ -z ${CUDACXX:-} ]] && ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDACXX=/usr/local/cuda/bin/nvcc
  fi
  if [[ -n ${CUDACXX:-} ]] || command -v nvcc >/dev/null 2>&1; then
    tmoe_log "CUDA: $("${CUDACXX:-nvcc}" --version | tail -n 2 | head -n 1)"
  else
    tmoe_log "CUDA: no nvcc found; the CUDA tests and benchmarks are not built"
  fi
}
