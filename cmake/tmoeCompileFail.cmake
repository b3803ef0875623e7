# Test-time driver for tmoe_add_compile_fail_test() (cmake/tmoeHelpers.cmake):
#   cmake -DTMOE_CF_CONFIG=<generated .cmake> -P tmoeCompileFail.cmake
# Compiles one source with -fsyntax-only. Passes only if the compiler rejects it AND its output matches the expected
# regular expression.
cmake_minimum_required(VERSION 3.24)

if(NOT DEFINED TMOE_CF_CONFIG OR NOT EXISTS "${TMOE_CF_CONFIG}")
  message(FATAL_ERROR "tmoeCompileFail.cmake: pass -DTMOE_CF_CONFIG=<file> (got '${TMOE_CF_CONFIG}')")
endif()
include(${TMOE_CF_CONFIG})
file(READ ${TMOE_CF_REGEX_FILE} regex)

set(command ${TMOE_CF_COMPILER} ${TMOE_CF_FLAGS})
# The compiler's own directories (e.g. /usr/include) stay implicit: -I on them breaks #include_next in libstdc++.
list(REMOVE_DUPLICATES TMOE_CF_INCLUDES)
foreach(dir IN LISTS TMOE_CF_INCLUDES)
  if(NOT dir IN_LIST TMOE_CF_IMPLICIT_INCLUDES)
    list(APPEND command -I${dir})
  endif()
endforeach()
foreach(def IN LISTS TMOE_CF_DEFINITIONS)
  list(APPEND command -D${def})
endforeach()
list(APPEND command ${TMOE_CF_SOURCE})

list(JOIN command " " shown)
message(STATUS "${TMOE_CF_NAME}: ${shown}")
execute_process(COMMAND ${command} RESULT_VARIABLE rc OUTPUT_VARIABLE output ERROR_VARIABLE output)

if(rc EQUAL 0)
  message(FATAL_ERROR "${TMOE_CF_NAME}: ${TMOE_CF_SOURCE} compiled, but it must not.\n"
                      "Expected a compile error matching: ${regex}\n${output}")
endif()
if(NOT output MATCHES "${regex}")
  message(FATAL_ERROR "${TMOE_CF_NAME}: compilation failed (exit ${rc}), but not with the intended error.\n"
                      "Expected output matching: ${regex}\nCompiler output:\n${output}")
endif()
message(STATUS "${TMOE_CF_NAME}: rejected as intended (matched: ${CMAKE_MATCH_0})")
