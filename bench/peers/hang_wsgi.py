# bench: the hello WSGI app, but GET /hang loops for ever (the hang case)
def app(environ, start_response):
    if environ.get('PATH_INFO') == '/hang':
        while True:
            pass
    start_response('200 OK', [('Content-Type', 'text/plain'),
                              ('Content-Length', '13')])
    return [b'Hello, World!']
