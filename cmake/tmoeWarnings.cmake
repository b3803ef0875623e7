# Warning flags for tmoe's own targets (tests, benchmarks, examples, the header check): the headers must compile
# cleanly under -Wall -Wextra -Wpedantic with g++ 12 and clang 14, and -Werror keeps it that way. This is the one
# place these flags are set; targets opt in by linking tmoe_warnings. Consumers never see them.
include_guard(GLOBAL)

add_library(tmoe_warnings INTERFACE)
target_compile_options(tmoe_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror>
  # nvcc: its own diagnostics are errors, and the host compiler sees -Wall -Wextra (-Wpedantic would flag the
  # line markers nvcc writes into its generated host code, not ours).
  $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror>)
