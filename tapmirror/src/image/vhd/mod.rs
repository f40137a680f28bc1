//! VHD images (Microsoft Virtual Hard Disk, as XenServer's SMAPIv1 keeps VDIs): dynamic and
//! differencing disks and their chains. (Being written: see issue "Data path II".)
