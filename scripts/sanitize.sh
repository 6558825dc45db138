#!/usr/bin/env bash
# Sanitizer builds of the host tier's C++ core (csrc/host_common, host_arena,
# copy_engine, ssd_tier, cuda_pin: plain C++, no torch) with a multithreaded
# stress test (tests/cpp/stress_host_tier.cpp), run under AddressSanitizer +
# UndefinedBehaviorSanitizer and under ThreadSanitizer.
#
#   scripts/sanitize.sh [rounds]        # default 300; exit status 0 = all clean
#
# Then, unless PYTHON_TESTS=0, the same sanitizers on the whole extension
# (built with LOHAN_EXT_SANITIZE, in its own cache entry) under the Python
# host-tier tests, including their multithreaded stress test. Python and torch
# are not instrumented, so the runtime is preloaded (with libstdc++, or ASan
# cannot intercept C++ throws), leaks are not checked, the resident-memory
# test is skipped (ASan's quarantine holds freed memory), and TSan runs with
# one OpenMP thread and ignores glibc's thread-local storage (scripts/tsan.supp):
# torch's OpenMP runtime is not instrumented, and its synchronisation is invisible.
#
# Environment: CXX (default c++), SANITIZERS (default "address thread"),
# SCRATCH (folder for the SSD files; default a fresh folder under /tmp, which
# is removed afterwards), PYTHON (default python), PYTHON_TESTS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-300}
CXX=${CXX:-c++}
OUT=build/sanitize
mkdir -p "$OUT"
SOURCES=(csrc/host_common.cpp csrc/host_arena.cpp csrc/copy_engine.cpp csrc/ssd_tier.cpp csrc/cuda_pin.cpp
         tests/cpp/stress_host_tier.cpp)
COMMON=(-std=c++17 -O1 -g -fno-omit-frame-pointer -Icsrc -pthread)

status=0
for san in ${SANITIZERS:-address thread}; do
  case $san in
    address) flags=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
             export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
             export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ;;
    thread)  flags=(-fsanitize=thread)
             export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 ;;
    *) echo "unknown sanitizer $san" >&2; exit 2 ;;
  esac
  bin=$OUT/stress_host_tier-$san
  echo "== $san: building $bin"
  "$CXX" "${COMMON[@]}" "${flags[@]}" "${SOURCES[@]}" -o "$bin" -ldl
  scratch=${SCRATCH:-$(mktemp -d /tmp/lohan-sanitize.XXXXXX)}
  mkdir -p "$scratch"
  echo "== $san: running ($ROUNDS rounds, SSD files under $scratch)"
  run=("$bin" "$scratch" "$ROUNDS")
  # TSan needs a narrow address-space layout; recent kernels randomise more
  # than it accepts, so run it with ASLR off when setarch can do that.
  if [[ $san == thread ]] && command -v setarch >/dev/null && setarch "$(uname -m)" -R true 2>/dev/null; then
    run=(setarch "$(uname -m)" -R "${run[@]}")
  fi
  if "${run[@]}"; then
    echo "== $san: clean"
  else
    echo "== $san: FAILED" >&2
    status=1
  fi
  [[ -z ${SCRATCH:-} ]] && rm -rf "$scratch"
done

if [[ ${PYTHON_TESTS:-1} != 0 ]]; then
  PY=${PYTHON:-python}
  stdcxx=$("$CXX" -print-file-name=libstdc++.so.6)
  tests=(tests/test_host_tier_stress.py tests/test_copy_engine.py tests/test_ssd_tier.py tests/test_swap_ops.py
         tests/test_host_arena.py tests/test_device_counter.py)
  for san in ${SANITIZERS:-address thread}; do
    case $san in
      address) rt=$("$CXX" -print-file-name=libasan.so); opts=(ASAN_OPTIONS=detect_leaks=0:halt_on_error=1)
               wrap=() ;;
      thread)  rt=$("$CXX" -print-file-name=libtsan.so)
               # one OpenMP thread: libgomp is not instrumented, so TSan would take its
               # workers' reads of the caller's stack for races
               opts=("TSAN_OPTIONS=halt_on_error=1 suppressions=$PWD/scripts/tsan.supp" OMP_NUM_THREADS=1)
               wrap=(); setarch "$(uname -m)" -R true 2>/dev/null && wrap=(setarch "$(uname -m)" -R) ;;
    esac
    echo "== $san: building the extension with -fsanitize=$san (LOHAN_EXT_SANITIZE)"
    LOHAN_EXT_SANITIZE=$san "$PY" -c "import lohan_compile.ext as e; e.load()" 2>/dev/null || true
    echo "== $san: Python host-tier tests with the sanitized extension"
    if env LD_PRELOAD="$rt $stdcxx" "${opts[@]}" LOHAN_EXT_SANITIZE=$san "${wrap[@]}" \
         "$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider -m "not inductor" -k "not resident"; then
      echo "== $san (Python): clean"
    else
      echo "== $san (Python): FAILED" >&2
      status=1
    fi
  done
fi
exit $status
