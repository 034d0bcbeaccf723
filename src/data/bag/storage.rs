//! Streaming message readers for the two rosbag2 storage plugins. Both stream: a bag of
//! full-HD images never has to fit in memory. rosbag2's zstd compression is undone here: a
//! compressed MCAP file is decompressed as it is read; sqlite needs a file, so a compressed
//! `.db3.zstd` is decompressed into a temporary file first; per-message compression is undone
//! message by message. MCAP chunk compression (zstd, lz4) is the MCAP reader's.

use super::{BagError, Compression, Result, Storage};
use mcap::records::Record;
use mcap::sans_io::linear_reader::{LinearReadEvent, LinearReader, LinearReaderOptions};
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest MCAP record we accept; a corrupt length beyond it is an error, not an allocation.
const MCAP_RECORD_LIMIT: usize = 256 << 20;
/// sqlite rows fetched per query.
const SQLITE_BATCH: i64 = 32;

/// One serialized message.
#[derive(Debug, Clone)]
pub struct BagMessage {
    /// Index into the topic list given to [`super::Bag::messages`].
    pub topic: usize,
    /// Receive time, ns since the epoch.
    pub log_time: u64,
    /// CDR bytes.
    pub data: Vec<u8>,
}

/// Messages of the selected topics, file after file.
pub struct MessageStream {
    storage: Storage,
    compression: Compression,
    files: VecDeque<PathBuf>,
    topics: Vec<String>,
    current: Option<FileReader>,
}

enum FileReader {
    Mcap(McapFile),
    Sqlite(SqliteFile),
}

impl MessageStream {
    pub(super) fn new(
        storage: Storage,
        compression: Compression,
        files: Vec<PathBuf>,
        topics: Vec<String>,
    ) -> Result<Self> {
        Ok(Self {
            storage,
            compression,
            files: files.into(),
            topics,
            current: None,
        })
    }

    fn open_next(&mut self) -> Result<bool> {
        let Some(path) = self.files.pop_front() else {
            return Ok(false);
        };
        let file = self.compression == Compression::File;
        self.current = Some(match self.storage {
            Storage::Mcap => FileReader::Mcap(McapFile::open(path, &self.topics, file)?),
            Storage::Sqlite3 => FileReader::Sqlite(SqliteFile::open(path, &self.topics, file)?),
        });
        Ok(true)
    }

    /// Undoes per-message compression.
    fn unpack(&self, msg: Result<BagMessage>) -> Result<BagMessage> {
        let mut msg = msg?;
        if self.compression == Compression::Message {
            msg.data = zstd::decode_all(msg.data.as_slice()).map_err(|e| BagError::Zstd {
                path: self.current_path(),
                source: e,
            })?;
        }
        Ok(msg)
    }

    fn current_path(&self) -> PathBuf {
        match &self.current {
            Some(FileReader::Mcap(f)) => f.path.clone(),
            Some(FileReader::Sqlite(f)) => f.path.clone(),
            None => PathBuf::new(),
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BagError + '_ {
    move |e| BagError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

impl Iterator for MessageStream {
    type Item = Result<BagMessage>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let next = match self.current.as_mut() {
                Some(FileReader::Mcap(f)) => f.next(),
                Some(FileReader::Sqlite(f)) => f.next(),
                None => None,
            }
            .map(|m| self.unpack(m));
            match next {
                Some(Err(e)) => {
                    // A corrupt file ends the stream.
                    self.files.clear();
                    self.current = None;
                    return Some(Err(e));
                }
                Some(ok) => return Some(ok),
                None => match self.open_next() {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => {
                        self.files.clear();
                        return Some(Err(e));
                    }
                },
            }
        }
    }
}

struct McapFile {
    path: PathBuf,
    file: Box<dyn Read>,
    reader: LinearReader,
    topics: Vec<String>,
    /// Channel id → index of the wanted topic (None: not wanted).
    channels: HashMap<u16, Option<usize>>,
    messages: u64,
}

impl McapFile {
    fn open(path: PathBuf, topics: &[String], zstd_file: bool) -> Result<Self> {
        let raw = std::fs::File::open(&path).map_err(io_err(&path))?;
        let file: Box<dyn Read> = if zstd_file {
            Box::new(zstd::Decoder::new(raw).map_err(io_err(&path))?)
        } else {
            Box::new(raw)
        };
        let reader = LinearReader::new_with_options(
            LinearReaderOptions::default().with_record_length_limit(MCAP_RECORD_LIMIT),
        );
        Ok(Self {
            path,
            file,
            reader,
            topics: topics.to_vec(),
            channels: HashMap::new(),
            messages: 0,
        })
    }

    fn next(&mut self) -> Option<Result<BagMessage>> {
        let mcap_err = |path: &PathBuf, after, e| BagError::Mcap {
            path: path.clone(),
            after,
            source: e,
        };
        loop {
            // The mcap crate panics on some corrupt chunks (a record longer than what is left of
            // its chunk underflows a length): a corrupt bag is an error that names the file, not
            // a crash.
            let reader = &mut self.reader;
            // Moved into the closure (FnOnce), so the event may borrow the reader.
            let next = move || {
                let reader = reader;
                reader.next_event()
            };
            let event = std::panic::catch_unwind(std::panic::AssertUnwindSafe(next));
            let event = match event {
                Ok(event) => event?,
                Err(_) => {
                    return Some(Err(BagError::McapReader {
                        path: self.path.clone(),
                        after: self.messages,
                    }))
                }
            };
            let event = match event {
                Ok(ev) => ev,
                Err(e) => return Some(Err(mcap_err(&self.path, self.messages, e))),
            };
            match event {
                LinearReadEvent::ReadRequest(need) => {
                    let buf = self.reader.insert(need);
                    match self.file.read(buf) {
                        Ok(n) => self.reader.notify_read(n),
                        Err(e) => {
                            return Some(Err(BagError::Io {
                                path: self.path.clone(),
                                source: e,
                            }))
                        }
                    }
                }
                LinearReadEvent::Record { opcode, data } => {
                    let record = match mcap::parse_record(opcode, data) {
                        Ok(r) => r,
                        Err(e) => return Some(Err(mcap_err(&self.path, self.messages, e))),
                    };
                    match record {
                        Record::Channel(ch) => {
                            let wanted = self.topics.iter().position(|t| *t == ch.topic);
                            self.channels.insert(ch.id, wanted);
                        }
                        Record::Message { header, data } => {
                            let index = self.messages;
                            self.messages += 1;
                            match self.channels.get(&header.channel_id) {
                                Some(Some(topic)) => {
                                    return Some(Ok(BagMessage {
                                        topic: *topic,
                                        log_time: header.log_time,
                                        data: data.into_owned(),
                                    }))
                                }
                                Some(None) => {}
                                None => {
                                    return Some(Err(BagError::UnknownChannel {
                                        path: self.path.clone(),
                                        index,
                                        id: header.channel_id.into(),
                                    }))
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

struct SqliteFile {
    path: PathBuf,
    conn: rusqlite::Connection,
    /// The decompressed copy of a `.db3.zstd`, deleted on drop (after `conn`).
    _plain: Option<tempfile::TempPath>,
    /// sqlite topic id → index of the wanted topic.
    topic_ids: HashMap<i64, usize>,
    last_id: i64,
    batch: VecDeque<BagMessage>,
    done: bool,
}

impl SqliteFile {
    fn open(path: PathBuf, topics: &[String], zstd_file: bool) -> Result<Self> {
        let sql = |path: &PathBuf| {
            let path = path.clone();
            move |e| BagError::Sqlite { path, source: e }
        };
        if !path.is_file() {
            return Err(BagError::Io {
                path,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let plain = zstd_file.then(|| decompress_to_temp(&path)).transpose()?;
        let conn = rusqlite::Connection::open_with_flags(
            plain.as_deref().unwrap_or(&path),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(sql(&path))?;
        let mut topic_ids = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT id, name FROM topics")
                .map_err(sql(&path))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .map_err(sql(&path))?;
            for row in rows {
                let (id, name) = row.map_err(sql(&path))?;
                if let Some(i) = topics.iter().position(|t| *t == name) {
                    topic_ids.insert(id, i);
                }
            }
        }
        Ok(Self {
            path,
            conn,
            _plain: plain,
            topic_ids,
            last_id: i64::MIN,
            batch: VecDeque::new(),
            done: false,
        })
    }

    fn fetch(&mut self) -> rusqlite::Result<()> {
        if self.topic_ids.is_empty() {
            self.done = true;
            return Ok(());
        }
        // Topic ids are integers from the bag itself, safe to inline.
        let ids: Vec<String> = self.topic_ids.keys().map(|id| id.to_string()).collect();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT id, topic_id, timestamp, data FROM messages WHERE id > ?1 AND topic_id IN ({}) ORDER BY id LIMIT ?2",
            ids.join(",")
        ))?;
        let rows = stmt.query_map(rusqlite::params![self.last_id, SQLITE_BATCH], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut n = 0;
        for row in rows {
            let (id, topic_id, ts, data) = row?;
            n += 1;
            self.last_id = id;
            if let Some(&topic) = self.topic_ids.get(&topic_id) {
                self.batch.push_back(BagMessage {
                    topic,
                    log_time: ts.max(0) as u64,
                    data,
                });
            }
        }
        if n < SQLITE_BATCH {
            self.done = true;
        }
        Ok(())
    }

    fn next(&mut self) -> Option<Result<BagMessage>> {
        while self.batch.is_empty() && !self.done {
            if let Err(e) = self.fetch() {
                self.done = true;
                return Some(Err(BagError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                }));
            }
        }
        self.batch.pop_front().map(Ok)
    }
}

/// `path` (one zstd stream) decompressed into a temporary file.
fn decompress_to_temp(path: &Path) -> Result<tempfile::TempPath> {
    let zstd_err = |e| BagError::Zstd {
        path: path.to_path_buf(),
        source: e,
    };
    let mut src =
        zstd::Decoder::new(std::fs::File::open(path).map_err(io_err(path))?).map_err(zstd_err)?;
    let mut tmp = tempfile::Builder::new()
        .prefix("mobile_vla-bag-")
        .suffix(".db3")
        .tempfile()
        .map_err(io_err(&std::env::temp_dir()))?;
    std::io::copy(&mut src, tmp.as_file_mut()).map_err(zstd_err)?;
    Ok(tmp.into_temp_path())
}
