//! qcow2 images through `imago`, as the SMAPIv3 backend keeps volumes. (Being written: see issue
//! "Data path II".)
