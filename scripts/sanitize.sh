#!/usr/bin/env bash
# Sanitizer builds of the host tier's C++ core (csrc/host_*.cpp, copy_engine,
# ssd_tier, cuda_pin: plain C++, no torch) with a multithreaded stress test
# (tests/cpp/stress_host_tier.cpp), run under AddressSanitizer +
# UndefinedBehaviorSanitizer and under ThreadSanitizer.
#
#   scripts/sanitize.sh [rounds]        # default 300; exit status 0 = all clean
#
# Environment: CXX (default c++), SANITIZERS (default "address thread"),
# SCRATCH (folder for the SSD files; default a fresh folder under /tmp, which
# is removed afterwards).
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
exit $status
