//! File transfer on the relay: uploads of end-to-end encrypted chunks into
//! PostgreSQL, downloads by the recipients in windows the client asks for (flow
//! control), and deletion once every recipient is done or the retention has passed.
//! Each operation is a transaction of its own on the uploader's or downloader's worker.

use super::blocks::IS_BLOCKED;
use super::mailbox::{StoreLimits, MAX_SENDER_ROWS, USAGE};
use crate::message::Target;
use fastchat_common::db::DbConn;
use fastchat_common::proto::{ErrorCode, Refusal, RelayToClient};

/// A file operation from a client (or the relay's retention sweep).
#[derive(Debug, Clone)]
pub enum FileOp {
    Begin {
        size: u64,
        chunks: u32,
        target: Target,
    },
    Put {
        file_id: i64,
        index: u32,
        data: String,
    },
    Status {
        file_id: i64,
    },
    Get {
        file_id: i64,
        from: u32,
        count: u32,
    },
    Done {
        file_id: i64,
    },
    /// Delete files older than this many seconds.
    Expire {
        retention_secs: u64,
    },
}

/// The frames answering an operation, or why it was refused.
pub type FileOutcome = Result<Vec<RelayToClient>, Refusal>;

/// Most chunks one `file_get` may ask for.
pub const MAX_WINDOW: u32 = 64;

fn not_found(file_id: i64) -> FileOutcome {
    Err(Refusal::new(
        ErrorCode::NotMember,
        format!("no file {file_id} for you"),
    ))
}

/// Runs `op` for `user_id` in one transaction.
pub fn run(
    conn: &mut DbConn,
    user_id: i64,
    op: FileOp,
    req: u64,
    limits: StoreLimits,
) -> Result<FileOutcome, postgres::Error> {
    let mut tx = conn.transaction()?;
    let outcome = match op {
        FileOp::Begin {
            size,
            chunks,
            target,
        } => {
            let recipients: Vec<i64> = match &target {
                Target::User(name) => {
                    match tx.query_opt("SELECT id FROM users WHERE name = $1", &[name])? {
                        Some(row) => {
                            let recipient: i64 = row.get(0);
                            if tx.query_opt(IS_BLOCKED, &[&recipient, &user_id])?.is_some() {
                                return Ok(Err(Refusal::new(
                                    ErrorCode::Blocked,
                                    format!("{name} does not accept files from you"),
                                )));
                            }
                            vec![recipient]
                        }
                        None => {
                            return Ok(Err(Refusal::new(
                                ErrorCode::UnknownUser,
                                format!("there is no user called {name}"),
                            )))
                        }
                    }
                }
                Target::Group(group_id) => {
                    let member = tx.query_opt(
                        "SELECT 1 FROM group_members WHERE group_id = $1 AND user_id = $2",
                        &[group_id, &user_id],
                    )?;
                    if member.is_none() {
                        return Ok(Err(Refusal::new(
                            ErrorCode::NotMember,
                            format!("you are not a member of group {group_id}"),
                        )));
                    }
                    tx.query(
                        "SELECT user_id FROM group_members gm
                         WHERE group_id = $1 AND user_id <> $2 AND NOT EXISTS
                             (SELECT 1 FROM blocks k WHERE k.user_id = gm.user_id AND k.blocked_id = $2)",
                        &[group_id, &user_id],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
                }
            };
            // The quota: what the uploader's messages and kept files take, and this.
            let usage = tx.query_one(USAGE, &[&vec![user_id], &MAX_SENDER_ROWS])?;
            let (count, bytes): (i64, i64) = (usage.get(1), usage.get(2));
            if count >= MAX_SENDER_ROWS || bytes + size as i64 > limits.max_stored_bytes {
                return Ok(Err(Refusal::new(
                    ErrorCode::OverQuota,
                    format!(
                        "you have {} MiB waiting for recipients or in files and this file is {} MiB; \
                         a user may have {} MiB: it frees as recipients fetch what waits",
                        bytes / (1024 * 1024),
                        size / (1024 * 1024),
                        limits.max_stored_bytes / (1024 * 1024)
                    ),
                )));
            }
            let file_id: i64 = tx
                .query_one(
                    "INSERT INTO files (owner_id, size, chunks) VALUES ($1, $2, $3) RETURNING id",
                    &[&user_id, &(size as i64), &(chunks as i32)],
                )?
                .get(0);
            tx.execute(
                "INSERT INTO file_access (file_id, user_id) SELECT $1, unnest($2::int8[])
                 ON CONFLICT DO NOTHING",
                &[&file_id, &recipients],
            )?;
            Ok(vec![RelayToClient::FileReady { id: req, file_id }])
        }
        FileOp::Put {
            file_id,
            index,
            data,
        } => {
            let file = tx.query_opt(
                "SELECT chunks FROM files WHERE id = $1 AND owner_id = $2",
                &[&file_id, &user_id],
            )?;
            match file {
                None => not_found(file_id),
                Some(row) if index >= row.get::<_, i32>(0) as u32 => Err(Refusal::new(
                    ErrorCode::BadFrame,
                    format!("file {file_id} has {} chunks", row.get::<_, i32>(0)),
                )),
                Some(_) => {
                    // A resent chunk (after a failover) is already there: fine.
                    tx.execute(
                        "INSERT INTO file_chunks (file_id, idx, data) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                        &[&file_id, &(index as i32), &data],
                    )?;
                    Ok(vec![RelayToClient::FilePutOk {
                        id: req,
                        file_id,
                        index,
                    }])
                }
            }
        }
        FileOp::Status { file_id } => {
            let owned = tx
                .query_opt(
                    "SELECT 1 FROM files WHERE id = $1 AND owner_id = $2",
                    &[&file_id, &user_id],
                )?
                .is_some();
            if owned {
                // Chunks of one uploader commit in order, so the stored ones are a prefix.
                let stored: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM file_chunks WHERE file_id = $1",
                        &[&file_id],
                    )?
                    .get(0);
                Ok(vec![RelayToClient::FileStatus {
                    id: req,
                    file_id,
                    stored: stored as u32,
                }])
            } else {
                not_found(file_id)
            }
        }
        FileOp::Get {
            file_id,
            from,
            count,
        } => {
            let allowed = tx
                .query_opt(
                    "SELECT 1 FROM file_access WHERE file_id = $1 AND user_id = $2
                     UNION ALL SELECT 1 FROM files WHERE id = $1 AND owner_id = $2",
                    &[&file_id, &user_id],
                )?
                .is_some();
            if allowed {
                let rows = tx.query(
                    "SELECT idx, data FROM file_chunks WHERE file_id = $1 AND idx >= $2
                     ORDER BY idx LIMIT $3",
                    &[&file_id, &(from as i32), &(count.min(MAX_WINDOW) as i64)],
                )?;
                let mut frames: Vec<RelayToClient> = rows
                    .iter()
                    .map(|r| RelayToClient::FileChunk {
                        id: req,
                        file_id,
                        index: r.get::<_, i32>(0) as u32,
                        data: r.get(1),
                    })
                    .collect();
                frames.push(RelayToClient::FileEnd {
                    id: req,
                    file_id,
                    sent: rows.len() as u32,
                });
                Ok(frames)
            } else {
                not_found(file_id)
            }
        }
        FileOp::Done { file_id } => {
            tx.execute(
                "DELETE FROM file_access WHERE file_id = $1 AND user_id = $2",
                &[&file_id, &user_id],
            )?;
            // The last recipient done: the file goes (its chunks with it).
            tx.execute(
                "DELETE FROM files f WHERE f.id = $1
                 AND NOT EXISTS (SELECT 1 FROM file_access a WHERE a.file_id = f.id)",
                &[&file_id],
            )?;
            Ok(Vec::new())
        }
        FileOp::Expire { retention_secs } => {
            let gone = tx.execute(
                "DELETE FROM files WHERE created_at < now() - make_interval(secs => $1)",
                &[&(retention_secs as f64)],
            )?;
            if gone > 0 {
                fastchat_common::info!("deleted {gone} files past their retention");
            }
            Ok(Vec::new())
        }
    };
    if outcome.is_ok() {
        tx.commit()?;
    }
    Ok(outcome)
}
