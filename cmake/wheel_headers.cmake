# Header-only NVIDIA libraries the CUDA backend compiles against, taken from their PyPI wheels (zips), pinned by
# hash and unpacked once into a per-user cache so clean builds do not download again:
#   CUTLASS 4.2 (nvidia-cutlass; headers under cutlass_library/source/include): the grouped expert GEMM;
#   cudnn-frontend 1.32 (nvidia-cudnn-frontend; include/): cuDNN's fused attention.
# -DDSV3_CUTLASS_INCLUDE= / -DDSV3_CUDNN_FRONTEND_INCLUDE= point at other copies. Without them (offline, no cache)
# the backend builds without that part and the configure output says so.
set(DSV3_CUTLASS_INCLUDE "" CACHE PATH "CUTLASS include directory (empty: fetch the pinned release)")
set(DSV3_CUDNN_FRONTEND_INCLUDE "" CACHE PATH "cudnn-frontend include directory (empty: fetch the pinned release)")

# dsv3_wheel_headers(<out> <given dir> <probe header> <name-version> <url> <sha256> <include subdir of the wheel>)
# sets <out> to an include directory holding <probe header>, or "" when there is none.
function(dsv3_wheel_headers out given probe id url sha256 subdir)
  if(given)
    if(NOT EXISTS "${given}/${probe}")
      message(FATAL_ERROR "${given} has no ${probe}")
    endif()
    set(${out} "${given}" PARENT_SCOPE)
    return()
  endif()
  if(DEFINED ENV{XDG_CACHE_HOME})
    set(cache "$ENV{XDG_CACHE_HOME}/dsv3")
  elseif(DEFINED ENV{HOME})
    set(cache "$ENV{HOME}/.cache/dsv3")
  else()
    set(cache "${CMAKE_BINARY_DIR}/_deps")
  endif()
  set(root "${cache}/${id}")
  set(include "${root}/${subdir}")
  if(NOT EXISTS "${include}/${probe}")
    set(wheel "${cache}/${id}.whl")
    message(STATUS "dsv3: fetching ${id} headers (its PyPI wheel) into ${root}")
    # The hash is checked after the download: EXPECTED_HASH would turn a machine without network into a failed
    # configure instead of a build without this part.
    file(DOWNLOAD "${url}" "${wheel}.part" STATUS st TLS_VERIFY ON INACTIVITY_TIMEOUT 60)
    list(GET st 0 code)
    if(NOT code EQUAL 0)
      file(REMOVE "${wheel}.part")
      list(GET st 1 why)
      message(STATUS "dsv3: ${id} not available (${why})")
      set(${out} "" PARENT_SCOPE)
      return()
    endif()
    file(SHA256 "${wheel}.part" got)
    if(NOT got STREQUAL sha256)
      file(REMOVE "${wheel}.part")
      message(FATAL_ERROR "${url}: SHA-256 ${got}, expected ${sha256}")
    endif()
    file(RENAME "${wheel}.part" "${wheel}")
    # Unpacked beside, then moved into place: a configure stopped half-way leaves no half tree behind.
    file(REMOVE_RECURSE "${root}.part")
    file(ARCHIVE_EXTRACT INPUT "${wheel}" DESTINATION "${root}.part" PATTERNS "${subdir}/*")
    file(REMOVE_RECURSE "${root}")
    file(RENAME "${root}.part" "${root}")
    file(REMOVE "${wheel}")
  endif()
  set(${out} "${include}" PARENT_SCOPE)
endfunction()

function(dsv3_find_cutlass out)
  dsv3_wheel_headers(dir "${DSV3_CUTLASS_INCLUDE}" cutlass/cutlass.h cutlass-4.2.0.0
    "https://files.pythonhosted.org/packages/21/6b/e86fc2fd536dd4b8bd2209aa31d7002610c501b0802337787eac9c9b328c/nvidia_cutlass-4.2.0.0-py3-none-any.whl"
    f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6 cutlass_library/source/include)
  set(${out} "${dir}" PARENT_SCOPE)
endfunction()

function(dsv3_find_cudnn_frontend out)
  # The wheel is built per Python version; its headers are the same in each (this one is CPython 3.11's).
  dsv3_wheel_headers(dir "${DSV3_CUDNN_FRONTEND_INCLUDE}" cudnn_frontend.h cudnn-frontend-1.32.0
    "https://files.pythonhosted.org/packages/11/02/660e2dd9f9d9f940e1641443771730612c3aadaafbc5ef7a93cc313d519d/nvidia_cudnn_frontend-1.32.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
    c6006556017a4d1c914c52a556c71b1267f2d6a0500f742e7b4edef539878df0 include)
  set(${out} "${dir}" PARENT_SCOPE)
endfunction()
