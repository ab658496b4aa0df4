"""`theychat soak`: a tree under steady traffic and seeded faults, judged from its logs.

plan.py chooses the faults, tree.py starts and stops a tree of our own, clients.py runs
the clients that write the transcripts, judge.py reads only what was written, and
report.py turns the verdict into report.md and a timeline; run.py ties them together.
"""
