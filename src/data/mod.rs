//! Data pipeline: structure and MSA parsing, features, transforms, crops, HDF5 cache, prefetching loader.
