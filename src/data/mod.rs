//! Data on its way in: the image bridge, episodes (HDF5), datasets and bag import.

pub mod image;
pub mod episode;
pub mod dataset;
pub mod bag;
