"""iSCAT physics: a simulator of labelled iSCAT images and random particle masks.

numpy only: no torch, napari or Qt import.
"""
