# bench: the 13-byte hello as a WSGI app, for gunicorn (sync workers)
def app(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain'),
                              ('Content-Length', '13')])
    return [b'Hello, World!']
