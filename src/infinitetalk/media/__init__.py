"""Media in and out: audio decoding, image/video frames and size buckets, the MP4 writer."""
