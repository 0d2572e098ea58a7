//! The `kscale` command line.
