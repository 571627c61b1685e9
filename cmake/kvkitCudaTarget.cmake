# Defines the INTERFACE target kvkit::cuda on top of kvkit::kvkit.
# Used both by the source tree and by the installed package config, so that
# kvkit::cuda exists wherever the consumer's machine has the CUDA toolkit.
function(kvkit_define_cuda_target host_target)
  if(TARGET kvkit::cuda)
    return()
  endif()
  if(NOT TARGET CUDA::cudart)
    find_package(CUDAToolkit QUIET)
  endif()
  if(NOT TARGET CUDA::cudart)
    return()
  endif()
  add_library(kvkit_cuda INTERFACE IMPORTED GLOBAL)
  target_link_libraries(kvkit_cuda INTERFACE ${host_target} CUDA::cudart)
  # CUB/Thrust ship with the toolkit (CCCL); its include dir is part of CUDA::cudart.
  target_compile_definitions(kvkit_cuda INTERFACE KVKIT_HAS_CUDA=1)
  add_library(kvkit::cuda ALIAS kvkit_cuda)
endfunction()
