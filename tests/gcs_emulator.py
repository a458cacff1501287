"""A local Cloud Storage emulator for tests (gcp-storage-emulator, in this process, on
127.0.0.1 only), with the generation preconditions real GCS has and the emulator lacks
(`ifGenerationMatch` on uploads and deletes: 0 = only if absent, N = only at generation N),
so the workdir lock is tested as GCS would run it. Nothing leaves the machine: the
environment `SAFE_ENV` keeps every client off metadata servers and real endpoints."""
import os
import socket
from http import HTTPStatus

# every Google client in tests and their subprocesses: no GCE metadata probe, no credential
# discovery, no gRPC bucket-type lookup; only the emulator's loopback address is ever reached
SAFE_ENV = {'NO_GCE_CHECK': 'true', 'GCE_METADATA_HOST': '127.0.0.1:9',
            'GCE_METADATA_IP': '127.0.0.1:9', 'GCE_METADATA_ROOT': '127.0.0.1:9',
            'FSSPEC_GCS_TOKEN': 'anon', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


def _generation(storage, bucket, name):
  try:
    return str(storage.get_file_obj(bucket, name)['generation'])
  except Exception:  # pylint: disable=broad-except  # NotFound
    return None


def _with_precondition(handler):
  def wrapped(request, response, storage, *args, **kwargs):
    want = request.query.get('ifGenerationMatch')
    if want:
      bucket = request.params.get('bucket_name')
      name = request.params.get('object_id') or (request.query.get('name') or [None])[0]
      if name is None and isinstance(request.data, dict):
        name = request.data.get('name') or (request.data.get('meta') or {}).get('name')
      have = _generation(storage, bucket, name) if name else None
      if (want[0] == '0' and have is not None) or (want[0] != '0' and have != want[0]):
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})
        return None
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def _with_generation_headers(handler):
  """Media downloads carry the object's generation in `x-goog-generation` on real GCS (the
  emulator omits it); tensorstore's gcs driver, i.e. orbax's multi-process OCDBT commit,
  reads it back."""
  def wrapped(request, response, storage, *args, **kwargs):
    out = handler(request, response, storage, *args, **kwargs)
    if int(response.status) in (200, 206):
      try:
        obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      except Exception:  # pylint: disable=broad-except  # NotFound: nothing to add
        return out
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
    return out
  return wrapped


def _serve(bucket: str) -> None:
  """Runs the emulator in this process (a threaded HTTP server, as GCS serves requests
  concurrently); prints its URL, serves until stdin closes."""
  import sys  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  from http import server as http_server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator import server as srv  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  quiet_logs()
  patched = {objects.insert: _with_precondition(objects.insert),
             objects.delete: _with_precondition(objects.delete),
             objects.download: _with_generation_headers(objects.download),
             objects.get: _with_generation_headers(objects.get)}
  lock = threading.RLock()

  def serialized(fn):
    # connections are served concurrently, requests one at a time: the emulator keeps its
    # state in files it rewrites whole (a concurrent reader can see a half-written one), and
    # a precondition must be checked and applied atomically, as GCS does
    def wrapped(*args, **kwargs):
      with lock:
        return fn(*args, **kwargs)
    return wrapped

  for _, handlers in srv.HANDLERS:
    for method, fn in list(handlers.items()):
      handlers[method] = serialized(patched.get(fn, fn))
  http_server.HTTPServer = http_server.ThreadingHTTPServer  # the emulator's APIThread uses it
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = srv.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  server.start()
  print(f'http://127.0.0.1:{port}', flush=True)
  # nobody reads the pipe after the URL: anything printed later must not fill it and stall
  sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with
  os.dup2(sys.stdout.fileno(), 1)
  sys.stdin.read()  # until the test closes the pipe
  threading.Thread(target=server.stop, daemon=True).start()


def start(bucket: str = 'test-bucket'):
  """(process, url) of an emulator with `bucket` in a subprocess (so a test's own threads never
  stall it); `stop(process)` ends it."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  proc = subprocess.Popen([sys.executable, __file__, bucket], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=open(os.environ.get('GCS_EMULATOR_LOG', os.devnull), 'w'),  # pylint: disable=consider-using-with
                          text=True)
  url = proc.stdout.readline().strip()
  if not url.startswith('http://127.0.0.1:'):
    proc.kill()
    raise RuntimeError(f'the storage emulator did not start ({url!r})')
  return proc, url


def stop(proc) -> None:
  proc.stdin.close()
  try:
    proc.wait(timeout=10)
  except Exception:  # pylint: disable=broad-except
    proc.kill()


def environment(url: str) -> dict:
  """What a process needs to use the emulator: gcsfs / google-cloud-storage
  (STORAGE_EMULATOR_HOST) and tensorstore, i.e. orbax (TENSORSTORE_GCS_HTTP_URL)."""
  return {**SAFE_ENV, 'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url}


def quiet_logs():
  import logging  # pylint: disable=import-outside-toplevel
  for name in ('gcp_storage_emulator', 'gcsfs', 'google'):
    logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == '__main__':
  import sys as _sys
  _serve(_sys.argv[1] if len(_sys.argv) > 1 else 'test-bucket')
