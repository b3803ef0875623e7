# Test-time driver for the package consumer tests (tests/package/CMakeLists.txt).
#
#   cmake -DMODE=install -DBUILD_DIR=<tmoe build> -DPREFIX=<dir> -DCMAKEDIR=<rel> -DINCLUDEDIR=<rel> -P run_consumer.cmake
#       Installs the tmoe build tree into a fresh PREFIX.
#   cmake -DMODE=consumer -DSOURCE=<project> -DBINARY=<dir> [-DRUN=<executable>] -DGENERATOR=... -DCXX_COMPILER=...
#         -DBUILD_TYPE=... -DCXX_FLAGS=... [-DPREFIX=<dir>] [-DTMOE_SOURCE_DIR=...] [-DTMOE_EXPECT_PREFIX=...]
#         [-DTMOE_EXPECT_CUDA=...] -P run_consumer.cmake
#       Configures the consumer project in a fresh BINARY directory; if RUN is given, builds it and runs RUN.
cmake_minimum_required(VERSION 3.24)

function(run_step)
  list(JOIN ARGN " " shown)
  message(STATUS "+ ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${shown}")
  endif()
endfunction()

if(MODE STREQUAL "install")
  file(REMOVE_RECURSE ${PREFIX})
  run_step(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${PREFIX})
  if(NOT EXISTS ${PREFIX}/${CMAKEDIR}/tmoeConfig.cmake OR NOT EXISTS ${PREFIX}/${INCLUDEDIR}/tmoe/tmoe.hpp)
    message(FATAL_ERROR "the install into ${PREFIX} lacks tmoeConfig.cmake or the headers")
  endif()
elseif(MODE STREQUAL "consumer")
  set(configure ${CMAKE_COMMAND} -S ${SOURCE} -B ${BINARY} -G ${GENERATOR}
                -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=${BUILD_TYPE} -DCMAKE_CXX_FLAGS=${CXX_FLAGS}
                -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
  if(DEFINED PREFIX)
    list(APPEND configure -DCMAKE_PREFIX_PATH=${PREFIX})
  endif()
  foreach(var IN ITEMS TMOE_SOURCE_DIR TMOE_EXPECT_PREFIX TMOE_EXPECT_CUDA)
    if(DEFINED ${var})
      list(APPEND configure -D${var}=${${var}})
    endif()
  endforeach()
  file(REMOVE_RECURSE ${BINARY})
  run_step(${configure})
  if(DEFINED RUN AND NOT RUN STREQUAL "")
    run_step(${CMAKE_COMMAND} --build ${BINARY})
    run_step(${BINARY}/${RUN})
  endif()
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE must be install or consumer (got '${MODE}')")
endif()
