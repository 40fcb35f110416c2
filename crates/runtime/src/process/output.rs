//! Module output: stdout and stderr read line by line ([`pump`]) into
//! size-rotated files with a millisecond UTC timestamp per line, read back
//! with `tail`/`since`/`until`/`follow` ([`LogSink::stream`]); and the same
//! for processes verged runs outside the module runtime ([`OutputLog`]).

use super::*;

pub(crate) async fn pump<R: AsyncRead + Unpin>(reader: R, stream: u8, sink: Arc<LogSink>) {
    let mut reader = BufReader::new(reader);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let (consumed, complete) = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&buf[..i]);
                    (i + 1, true)
                }
                None => {
                    line.extend_from_slice(buf);
                    (buf.len(), false)
                }
            },
        };
        reader.consume(consumed);
        if complete || line.len() >= MAX_LINE {
            while line.len() > MAX_LINE {
                let rest = line.split_off(MAX_LINE);
                sink.write(stream, std::mem::replace(&mut line, rest)).await;
            }
            sink.write(stream, std::mem::take(&mut line)).await;
        }
    }
    if !line.is_empty() {
        sink.write(stream, line).await;
    }
}

/// The captured output of a process verged runs outside the module runtime
/// (the process agent): the same rotating files, line format and
/// `tail`/`since`/`until`/`follow` reading as a module's, in `dir`.
pub struct OutputLog {
    sink: Arc<LogSink>,
    next_run: AtomicU64,
}

/// One run's capture; [`OutputRun::finish`] after the process exited.
pub struct OutputRun {
    sink: Arc<LogSink>,
    run: u64,
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

impl OutputLog {
    /// Logs in `dir` (`output.log`, `output.log.1` …), rotated at
    /// `max_bytes`, `max_files` kept (at least 1).
    pub fn new(dir: PathBuf, max_bytes: u64, max_files: usize) -> Self {
        Self {
            sink: Arc::new(LogSink::new(dir, max_bytes, max_files.max(1))),
            next_run: AtomicU64::new(1),
        }
    }

    /// Starts copying a child's stdout and stderr into the log.
    pub async fn capture(
        &self,
        stdout: Option<impl AsyncRead + Unpin + Send + 'static>,
        stderr: Option<impl AsyncRead + Unpin + Send + 'static>,
    ) -> OutputRun {
        let run = self.next_run.fetch_add(1, Ordering::Relaxed);
        self.sink.begin_run(run).await;
        let mut pumps = Vec::new();
        if let Some(out) = stdout {
            pumps.push(tokio::spawn(pump(out, b'O', self.sink.clone())));
        }
        if let Some(err) = stderr {
            pumps.push(tokio::spawn(pump(err, b'E', self.sink.clone())));
        }
        OutputRun {
            sink: self.sink.clone(),
            run,
            pumps,
        }
    }

    /// The lines the options select; with `follow`, also new lines until
    /// the current run ends.
    pub async fn stream(&self, options: &LogOptions) -> Result<LogStream, RuntimeError> {
        self.sink.stream(options).await
    }
}

impl OutputRun {
    /// The process exited: drains what its pipes still hold (bounded) and
    /// ends followers of this run.
    pub async fn finish(self) {
        for p in self.pumps {
            let abort = p.abort_handle();
            if tokio::time::timeout(DRAIN_GRACE, p).await.is_err() {
                abort.abort();
            }
        }
        self.sink.end_run(self.run).await;
    }
}

// ---------------------------------------------------------------------------
// Logs

/// One captured line.
#[derive(Debug, Clone)]
pub(crate) struct LogLine {
    pub(crate) ts: Timestamp,
    pub(crate) msg: Bytes,
}

#[derive(Debug, Clone)]
pub(crate) enum LogEvent {
    Line(Arc<LogLine>),
    RunEnded(u64),
}

pub(crate) struct SinkState {
    file: Option<tokio::fs::File>,
    size: u64,
    running: Option<u64>,
}

/// A module's log files. Line format: `<ISO timestamp> <O|E> <text>\n`.
pub(crate) struct LogSink {
    dir: PathBuf,
    max_bytes: u64,
    max_files: usize,
    state: tokio::sync::Mutex<SinkState>,
    tx: broadcast::Sender<LogEvent>,
}

impl LogSink {
    pub(crate) fn new(dir: PathBuf, max_bytes: u64, max_files: usize) -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            dir,
            max_bytes,
            max_files,
            state: tokio::sync::Mutex::new(SinkState {
                file: None,
                size: 0,
                running: None,
            }),
            tx,
        }
    }

    pub(crate) fn path(&self, index: usize) -> PathBuf {
        if index == 0 {
            self.dir.join("output.log")
        } else {
            self.dir.join(format!("output.log.{index}"))
        }
    }

    pub(crate) async fn begin_run(&self, run: u64) {
        self.state.lock().await.running = Some(run);
    }

    pub(crate) async fn end_run(&self, run: u64) {
        let mut st = self.state.lock().await;
        if st.running == Some(run) {
            st.running = None;
        }
        // Close the file so a removed module's directory really goes away.
        st.file = None;
        let _ = self.tx.send(LogEvent::RunEnded(run));
    }

    pub(crate) async fn rotate(&self, st: &mut SinkState) -> std::io::Result<()> {
        st.file = None;
        st.size = 0;
        if self.max_files <= 1 {
            return match tokio::fs::remove_file(self.path(0)).await {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        for i in (1..self.max_files - 1).rev() {
            match tokio::fs::rename(self.path(i), self.path(i + 1)).await {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        tokio::fs::rename(self.path(0), self.path(1)).await
    }

    pub(crate) async fn write(&self, stream: u8, msg: Vec<u8>) {
        let line = LogLine {
            ts: Timestamp::now(),
            msg: Bytes::from(msg),
        };
        let mut text = Vec::with_capacity(line.msg.len() + 32);
        text.extend_from_slice(line.ts.to_iso8601().as_bytes());
        text.push(b' ');
        text.push(stream);
        text.push(b' ');
        text.extend_from_slice(&line.msg);
        text.push(b'\n');
        let mut st = self.state.lock().await;
        if let Err(e) = self.write_locked(&mut st, &text).await {
            tracing::warn!(dir = %self.dir.display(), error = %e, "writing module log failed");
            st.file = None;
        }
        let _ = self.tx.send(LogEvent::Line(Arc::new(line)));
    }

    pub(crate) async fn write_locked(
        &self,
        st: &mut SinkState,
        text: &[u8],
    ) -> std::io::Result<()> {
        let len = text.len() as u64;
        if st.file.is_some() && st.size > 0 && st.size + len > self.max_bytes {
            self.rotate(st).await?;
        }
        if st.file.is_none() {
            tokio::fs::create_dir_all(&self.dir).await?;
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(0))
                .await?;
            st.size = file.metadata().await?.len();
            st.file = Some(file);
            if st.size > 0 && st.size + len > self.max_bytes {
                self.rotate(st).await?;
                st.file = Some(
                    tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(self.path(0))
                        .await?,
                );
            }
        }
        if let Some(file) = st.file.as_mut() {
            file.write_all(text).await?;
            file.flush().await?;
            st.size += len;
        }
        Ok(())
    }

    pub(crate) async fn read_all(&self) -> Vec<LogLine> {
        let mut lines = Vec::new();
        for i in (0..self.max_files).rev() {
            let data = match tokio::fs::read(self.path(i)).await {
                Ok(d) => d,
                Err(_) => continue,
            };
            for raw in data.split(|b| *b == b'\n') {
                if let Some(line) = parse_line(raw) {
                    lines.push(line);
                }
            }
        }
        lines
    }

    pub(crate) async fn stream(&self, options: &LogOptions) -> Result<LogStream, RuntimeError> {
        let (lines, rx, running) = {
            let st = self.state.lock().await;
            let lines = self.read_all().await;
            let rx = options.follow.then(|| self.tx.subscribe());
            (lines, rx, st.running)
        };
        let since = options.since;
        let until = options.until;
        let in_window =
            move |ts: Timestamp| since.is_none_or(|s| ts >= s) && until.is_none_or(|u| ts < u);
        let mut selected: Vec<LogLine> = lines.into_iter().filter(|l| in_window(l.ts)).collect();
        if let Some(n) = options.tail {
            let skip = selected.len().saturating_sub(n);
            selected.drain(..skip);
        }
        let timestamps = options.timestamps;
        let existing = futures_util::stream::iter(
            selected
                .into_iter()
                .map(move |l| Ok(format_line(&l, timestamps))),
        );
        let (Some(rx), Some(run)) = (rx, running) else {
            return Ok(existing.boxed());
        };
        let deadline = match until {
            Some(u) => {
                let left = u.as_millis() - Timestamp::now().as_millis();
                if left <= 0 {
                    return Ok(existing.boxed());
                }
                Some(tokio::time::Instant::now() + Duration::from_millis(left.unsigned_abs()))
            }
            None => None,
        };
        let follow = futures_util::stream::unfold(rx, move |mut rx| async move {
            loop {
                let event = match deadline {
                    Some(d) => tokio::select! {
                        ev = rx.recv() => ev,
                        () = tokio::time::sleep_until(d) => return None,
                    },
                    None => rx.recv().await,
                };
                match event {
                    Ok(LogEvent::Line(l)) => {
                        if until.is_some_and(|u| l.ts >= u) {
                            return None;
                        }
                        if since.is_some_and(|s| l.ts < s) {
                            continue;
                        }
                        return Some((Ok(format_line(&l, timestamps)), rx));
                    }
                    Ok(LogEvent::RunEnded(r)) if r == run => return None,
                    Ok(LogEvent::RunEnded(_)) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "log follower lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(existing.chain(follow).boxed())
    }
}

pub(crate) fn parse_line(raw: &[u8]) -> Option<LogLine> {
    let sp = raw.iter().position(|b| *b == b' ')?;
    let ts = Timestamp::parse(std::str::from_utf8(&raw[..sp]).ok()?).ok()?;
    // `<ts> <S> <msg>`: the message starts two bytes after the stream tag.
    let msg = raw.get(sp + 3..).unwrap_or_default();
    Some(LogLine {
        ts,
        msg: Bytes::copy_from_slice(msg),
    })
}

pub(crate) fn format_line(line: &LogLine, timestamps: bool) -> Bytes {
    let mut out = Vec::with_capacity(line.msg.len() + 26);
    if timestamps {
        out.extend_from_slice(line.ts.to_iso8601().as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(&line.msg);
    out.push(b'\n');
    Bytes::from(out)
}
