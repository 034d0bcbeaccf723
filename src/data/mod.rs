//! Data on its way in: the image bridge, episodes (HDF5), step sampling, live recording, datasets
//! and bag import.

pub mod bag;
pub mod dataset;
pub mod episode;
pub mod image;
pub mod recording;
pub mod sampling;
