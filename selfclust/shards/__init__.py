"""`selfclust shard`: writing, checking and uploading shard sets."""
