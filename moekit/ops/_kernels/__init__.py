"""Triton kernel bodies only (@triton.jit); the public ops in moekit.ops validate, allocate and launch."""
