import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;

/**
 * Two pgjdbc connections through the pooler (a pool of one server in transaction mode): each sets
 * its own settings and reads them back, several times, with plain and prepared statements
 * (prepareThreshold=1 makes them named server-side statements). Prints one line per read:
 * "connection setting value".
 */
public class SessionSettings {
    static String read(Connection c, String sql) throws Exception {
        try (PreparedStatement p = c.prepareStatement(sql); ResultSet r = p.executeQuery()) {
            r.next();
            String v = r.getString(1);
            return v == null ? "" : v;
        }
    }

    public static void main(String[] args) throws Exception {
        try (Connection a = DriverManager.getConnection(args[0], "postgres", "");
                Connection b = DriverManager.getConnection(args[0], "postgres", "")) {
            try (Statement s = a.createStatement()) {
                s.execute("SET statement_timeout = 4321");
                s.execute("SET app.jdbc = 'mine'");
            }
            b.setAutoCommit(false);
            try (Statement s = b.createStatement()) {
                s.execute("SET app.jdbc = 'rolled back'");
            }
            b.rollback();
            b.setAutoCommit(true);
            for (int i = 0; i < 3; i++) {
                for (Connection c : new Connection[] {a, b}) {
                    String name = c == a ? "a" : "b";
                    System.out.println(name + " statement_timeout " + read(c, "SHOW statement_timeout"));
                    System.out.println(name + " app.jdbc " + read(c, "SELECT current_setting('app.jdbc', true)"));
                    System.out.println(name + " extra_float_digits " + read(c, "SHOW extra_float_digits"));
                }
            }
        }
    }
}
