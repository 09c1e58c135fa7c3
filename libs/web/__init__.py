"""`surveyor web`: the live front-end process. It follows the handler's status port (feed.py),
serves the HTTP API and the page (app.py, previews.py; websockets in live.py), renders arrays
(images.py), and sends commands to the handler's command port behind a token (access.py, auth.py).
It never joins the data plane: a slow browser costs the pipeline nothing. server.py starts it.
The page itself (static/) is plain files; the API is its only contract.
"""
