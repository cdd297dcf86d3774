"""Expert analysis of a trained model: load, topographic maps, diversity, specialisation, invariance."""
