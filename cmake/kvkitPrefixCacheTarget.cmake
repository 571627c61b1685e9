# Defines kvkit::prefix_cache: kvkit::kvkit plus the include directory of
# xxHash's header (Debian: libxxhash-dev), which kvkit/memory/prefix_cache.hpp
# uses header-only (XXH_INLINE_ALL: nothing to link). Only code that includes
# prefix_cache.hpp needs it.
function(kvkit_define_prefix_cache_target host_target)
  if(TARGET kvkit::prefix_cache)
    return()
  endif()
  find_path(KVKIT_XXHASH_INCLUDE_DIR xxhash.h)
  if(NOT KVKIT_XXHASH_INCLUDE_DIR)
    return()
  endif()
  add_library(kvkit_prefix_cache INTERFACE IMPORTED GLOBAL)
  target_link_libraries(kvkit_prefix_cache INTERFACE ${host_target})
  target_include_directories(kvkit_prefix_cache SYSTEM INTERFACE ${KVKIT_XXHASH_INCLUDE_DIR})
  add_library(kvkit::prefix_cache ALIAS kvkit_prefix_cache)
endfunction()
