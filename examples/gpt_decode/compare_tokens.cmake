# Runs the CPU build (CPU) and the CUDA build (GPU) of gpt_decode with the same
# arguments (ARGS, a ;-list including --print-tokens) and fails unless every
# request's generated token ids are the same. Without a GPU it prints
# "SKIPPED: no CUDA device" (CTest's SKIP_REGULAR_EXPRESSION: cmake -P cannot
# exit with 77 before CMake 3.29).
execute_process(COMMAND ${GPU} ${ARGS} RESULT_VARIABLE gpu_rc OUTPUT_VARIABLE gpu_out ERROR_VARIABLE gpu_err)
if(gpu_rc EQUAL 77)
  message("SKIPPED: no CUDA device is present")
  message(FATAL_ERROR "gpt_decode_cuda skipped")
endif()
if(NOT gpu_rc EQUAL 0)
  message(FATAL_ERROR "gpt_decode_cuda failed (${gpu_rc}):\n${gpu_out}\n${gpu_err}")
endif()
execute_process(COMMAND ${CPU} ${ARGS} RESULT_VARIABLE cpu_rc OUTPUT_VARIABLE cpu_out ERROR_VARIABLE cpu_err)
if(NOT cpu_rc EQUAL 0)
  message(FATAL_ERROR "gpt_decode failed (${cpu_rc}):\n${cpu_out}\n${cpu_err}")
endif()
string(REGEX MATCHALL "tokens [0-9]+:[ 0-9]*" gpu_tokens "${gpu_out}")
string(REGEX MATCHALL "tokens [0-9]+:[ 0-9]*" cpu_tokens "${cpu_out}")
list(LENGTH cpu_tokens n)
if(n EQUAL 0)
  message(FATAL_ERROR "no 'tokens N:' lines in the CPU output (is --print-tokens in ARGS?):\n${cpu_out}")
endif()
if(NOT gpu_tokens STREQUAL cpu_tokens)
  string(REPLACE ";" "\n" gpu_lines "${gpu_tokens}")
  string(REPLACE ";" "\n" cpu_lines "${cpu_tokens}")
  message(FATAL_ERROR "greedy tokens differ\nCPU:\n${cpu_lines}\nGPU:\n${gpu_lines}")
endif()
message("${n} requests: identical greedy tokens on the CPU and the GPU")
