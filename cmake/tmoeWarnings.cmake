# Warning flags for tmoe's own targets (tests, benchmarks, examples): the headers must compile cleanly
# under -Wall -Wextra -Wpedantic with g++ 12 and clang 14, and -Werror keeps it that way.
add_library(tmoe_warnings INTERFACE)
target_compile_options(tmoe_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror>)
