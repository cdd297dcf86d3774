"""Expert analysis of a trained model: load, topographic maps, diversity, specialisation, invariance.

``report`` writes the expert report of an export, ``invariance`` measures accuracy and noise-free
routing under shifts and rotations of the test images; ``python -m moge_ds.analysis`` runs either.
"""
