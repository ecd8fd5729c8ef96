"""Files on disk, never half-written: images and their metadata, batch manifests, latents files, the
gallery."""
