"""The bridge: runs engine calls on worker threads and turns their callbacks into Qt signals."""
