"""`clusterlab cluster FOLDER --out DIR`: group an unlabeled folder of photos (clusterlab.cluster.command).

cache.py      the folder walked and decoded once, into a uint8 memmap the epochs read from
data.py       that cache as the data module
recipe.py     the models for photos, as configs (what config.yaml records), and cluster renumbering
choose_k.py   the number of clusters, chosen without labels
report.py     report.html, its thumbnails and figures
output.py     the output folder, built aside and swapped in whole
command.py    the command: one phase after another
"""
