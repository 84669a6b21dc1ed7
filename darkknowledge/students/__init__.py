"""Students: builders that derive a student from a teacher (shrink, efficient operations,
quantization), and what decides deployment (size, FLOPs, latency, export).

The survey's teacher-student architecture relations (Gou et al., "Knowledge Distillation: A
Survey", IJCV 2021, Sec. 6): a simplified teacher (fewer layers and channels), a quantized
teacher, a small network with efficient operations, a network found by architecture search, or
the same network.
"""
