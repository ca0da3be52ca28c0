"""Reading shard sets: URLs, the tolerant tar reader, epoch plans, streams, augmentation."""
