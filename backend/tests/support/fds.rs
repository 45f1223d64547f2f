//! File descriptors a client hands the server: memfds (sealed or not, sparse), eventfds, and
//! the wrong kinds a hostile client sends in their place.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Seals QEMU's `memory-backend-memfd` puts on guest RAM: the server may map it.
pub const GUEST_RAM_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

fn owned(fd: libc::c_int, what: &str) -> OwnedFd {
    assert!(fd >= 0, "{what}: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd the caller just created and nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A memfd of `size` bytes (sparse) with `seals` added (none if 0).
pub fn memfd(name: &str, size: u64, seals: libc::c_int) -> OwnedFd {
    let cname = CString::new(name).expect("memfd name");
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = owned(
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) },
        "memfd_create",
    );
    // SAFETY: ftruncate on a valid fd we own.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
    if seals != 0 {
        // SAFETY: F_ADD_SEALS with an int argument on a valid memfd.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    fd
}

/// A non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd creation.
    owned(
        unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
        "eventfd",
    )
}

/// Read and reset an eventfd counter (0 if it was not signalled).
pub fn eventfd_take(fd: &OwnedFd) -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: an 8-byte read into a local buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        0
    }
}

/// A pipe: (read end, write end), blocking.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    (owned(fds[0], "pipe"), owned(fds[1], "pipe"))
}

/// `path` opened read-only (a device node or a directory).
pub fn open_read_only(path: &str) -> OwnedFd {
    let cpath = CString::new(path).expect("path");
    // SAFETY: open with a valid NUL-terminated path.
    owned(
        unsafe { libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) },
        path,
    )
}

/// The size of the file behind `fd` (`fstat`).
pub fn file_size(fd: &OwnedFd) -> Option<u64> {
    // SAFETY: fstat into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and buffer.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    (rc == 0).then_some(st.st_size as u64)
}

/// One `sendmsg` of `bytes` with `fds` attached (`SCM_RIGHTS`, up to the kernel's 253), for
/// sending more fds than a well-behaved client would; the bytes sent.
pub fn send_with_many_fds(
    socket: std::os::fd::BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<usize> {
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header and
    // its data fit; the fds are copied into its data area.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast(), raw.len());
    }
    // SAFETY: a valid msghdr whose buffers outlive the call.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
