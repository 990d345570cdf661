"""DreamBooth subject fine-tuning of Stable Diffusion (diffusers + accelerate)."""
