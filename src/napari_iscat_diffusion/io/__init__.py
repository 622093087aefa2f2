"""Reading, writing and checking image/mask data on disk: TIFF pairs (``tiff_pairs``), HDF5 patch files
(``hdf5_patches``) and dataset checks (``dataset_check``). numpy, tifffile and (lazily) h5py only."""
