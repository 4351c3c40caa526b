"""comfyui-adacluster: training-free sparse attention for video diffusion transformers in ComfyUI."""
