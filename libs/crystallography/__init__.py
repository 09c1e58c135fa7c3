"""Serial crystallography science: detector layouts, frame corrections, peakfinder8, hits and sums.

Pure modules: arrays in, arrays out, no sockets. The peak stage (services/peak_worker) and the
writer's aggregation (services/writer/sx_file.py) are the shells around them.
"""
