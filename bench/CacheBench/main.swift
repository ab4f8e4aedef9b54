print("cache-bench: not written yet")
