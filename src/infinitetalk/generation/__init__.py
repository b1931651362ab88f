"""Window planning, sampling, guidance, colour correction and the InfiniteTalk pipeline."""
