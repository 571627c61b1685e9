# Our own targets (tests, benchmarks, examples): warnings are errors, optional
# sanitizers, and OpenMP where available so that the CPU ops' threaded paths
# are built and tested (kvkit's headers use OpenMP only when the including
# program enables it; consumers get none of these flags).
option(KVKIT_USE_OPENMP "Build kvkit's own tests, benchmarks and examples with OpenMP" ON)
if(KVKIT_USE_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
endif()

function(kvkit_strict_target target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Werror>
    $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror --expt-relaxed-constexpr>)
  if(KVKIT_USE_OPENMP AND OpenMP_CXX_FOUND)
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
  endif()
  if(KVKIT_SANITIZE)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer>)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined -fno-sanitize-recover=all)
  endif()
endfunction()
