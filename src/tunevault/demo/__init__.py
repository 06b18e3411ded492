"""The main job: real autotuned kernels run cold and warm, side by side."""
