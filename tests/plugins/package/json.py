raise RuntimeError("json.py in the plugin's folder shadowed the standard library")
