"""Scale-out over Ray (docs/scale.md): ``serving.py`` runs N Studio replicas behind the A1111
generate routes and the job API with Ray Serve, ``dispatch.py`` sends the job store's queued jobs
to those replicas; ``batch.py`` maps a file of requests over Ray Data actors, one Studio each;
``replica.py`` is what both run in a replica. Ray is an optional dependency
(``pip install -e '.[ray]'``): only these modules import it, and only the commands that need
them import these modules.
"""
