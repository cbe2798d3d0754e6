// bench: Node cluster with N workers (default 2) answering the 13-byte
// hello; the primary respawns a worker that dies, as a prefork master does.
const cluster = require('cluster');
const http = require('http');
const port = +process.argv[2];
const n = +(process.argv[3] || 2);
if (cluster.isPrimary) {
  for (let i = 0; i < n; i++) cluster.fork();
  cluster.on('exit', () => cluster.fork());
  process.on('SIGTERM', () => { cluster.removeAllListeners('exit');
    for (const id in cluster.workers) cluster.workers[id].kill(); process.exit(0); });
} else {
  http.createServer((req, res) => {
    res.writeHead(200, {'Content-Type': 'text/plain'});
    res.end('Hello, World!');
  }).listen(port, '127.0.0.1');
}
